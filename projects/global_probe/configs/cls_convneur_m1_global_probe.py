# ConvNeur-M1 on the global-context probe (projects/global_probe/probe/data.py:
# are the two ringed marks the same colour?). Also a Table 5 recipe:
#   python tools/analysis_tools/analyze_model.py --tasks ablation-table \
#       --recipe projects/global_probe/configs/cls_convneur_m1_global_probe.py
# Starts from the tiny-ImageNet ablation recipe (light augmentation, no Mixup /
# CutMix, 4 epochs, one process); only the data change, and each change says why.
# Untrained so far: given projects/global_probe/README.md, 4 epochs are likely far too few.
_base_ = ['../../../configs/ablations/recipes/imagenet_tiny_m3.py']

# the generator's default output; --tasks ablation-table writes it when missing
data_root = '{{$GLOBAL_PROBE_ROOT:data/global_probe}}'
data_generator = 'projects.global_probe.probe.data'  # run from the repository root
classes = ('different', 'same')  # the generator's CLASSES (meta/classes.txt)
num_classes = len(classes)

# No crop and no resize: the images are already 128 x 128, and a crop can cut a
# target out (the label would then be wrong). A horizontal flip keeps the label.
train_pipeline = [p for p in _base_.train_pipeline
                  if p['type'] in ('LoadImageFromFile', 'RandomFlip', 'PackInputs')]
test_pipeline = [p for p in _base_.test_pipeline
                 if p['type'] in ('LoadImageFromFile', 'PackInputs')]

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)
train_dataloader = dict(dataset=dict(data_root=data_root, metainfo=dict(classes=classes),
                                     pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=dict(classes=classes),
                                   pipeline=test_pipeline))
test_dataloader = val_dataloader
# two classes: top-5 is meaningless (and MMPretrain refuses k > num_classes)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
