# The order probe (projects/global_probe/README.md): a red and a green bar far apart; is the red
# one above? A Table 5 recipe on which local-only stays at chance and the memory
# learns:
#   python tools/analysis_tools/analyze_model.py --tasks ablation-table \
#       --recipe projects/global_probe/configs/cls_convneur_order_probe.py --row-minutes 25 \
#       --seeds 0 1 2 --flops-shape 144 --skip-speed
#   (then the same with --speed-only --speed-shape 144)
# Why local-only must fail here: both classes hold the same two bars, only their
# order differs; every bar stays 24 px inside the image and the two 28 px apart,
# so no 28 px window of the one-block network below sees both bars or the zero
# padding, and the average over windows (GRN and the final LayerNorm included,
# which see the map as a set) is the same for both classes (in the drawn image;
# projects/global_probe/README.md on what JPEG and the background's gradient add). The memory reads its
# chunks in raster order: the lower bar reads what the upper one wrote.
# Only the data, the network's size and the schedule change from the global probe
# recipe; each change says why.
_base_ = ['./cls_convneur_m1_global_probe.py']

data_root = '{{$ORDER_PROBE_ROOT:data/order_probe}}'
data_generator = 'projects.global_probe.probe.data'
# 144 px, ellipses 11.5-14.4 px high and 6x as wide (more area per chunk than a
# disc in the same rows), at least 24 px (0.1667 x 144) inside the image and
# 43 px apart in y; 500 training and 250 validation images per class
size = 144
data_generator_args = [
    '--relation', 'above', '--kinds', '2', '--distractors', '0', '--size', str(size),
    '--radius-lo', '0.04', '--radius-hi', '0.05', '--aspect', '6', '--min-dist', '0.3',
    '--border', '0.1667', '--train-per-class', '500', '--val-per-class', '250']
classes = ('red_below', 'red_above')  # the generator's ORDER_CLASSES
model = dict(head=dict(num_classes=len(classes)))
train_dataloader = dict(dataset=dict(data_root=data_root, metainfo=dict(classes=classes)))
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=dict(classes=classes)))
test_dataloader = val_dataloader

# One stage of one block (C = 32, C_m = 16): the local branch sees 4 + 6 x 4 = 28
# pixels. Chunks of 144 tokens: 9 per image of 36 x 36 tokens, as many as the
# probe's XOR needed (projects/global_probe/README.md, "Resolution"). Rows that set their own C_m
# (Table 5's C_m rows) keep it: memory_cfg.dim overrides arch.memory_dim.
backbone_overrides = dict(arch=dict(depths=[1], dims=[32], memory_dim=16), out_indices=(0, ),
                          memory_cfg=dict(chunk_size=144))

# 6 epochs of 32 steps: the probe loop (projects/global_probe/probe/train.py) learned the
# task in about 100 steps at this learning rate
optim_wrapper = dict(optimizer=dict(lr=3e-3))
max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(checkpoint=dict(interval=max_epochs))
