# ConvNeur-M4 on ImageNet-1K at 224x224 (paper Table 2): the M1 recipe.
_base_ = ['./cls_convneur_m1_300e_in1k.py']

arch, width, drop_path_rate = 'm4', 640, 0.15
batch, accumulate = 32, 16  # per GPU with --amp, x 8 GPUs = 4096
model = dict(
    backbone=dict(arch=arch, drop_path_rate=drop_path_rate),
    head=dict(in_channels=width))
train_dataloader = dict(batch_size=batch)
optim_wrapper = dict(accumulative_counts=accumulate)
auto_scale_lr = dict(base_batch_size=8 * batch)
