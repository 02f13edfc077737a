"""inner_model and enable_tta: tools/test.py --tta and the checks that look
through a test-time-augmentation model."""
import pytest
import torch
from mmengine.model import BaseModel, BaseTTAModel

from convneur_mm.engine.wrapping import enable_tta, inner_model
from convneur_mm.apis.launch import load_config


class _TTA(BaseTTAModel):
    def merge_preds(self, data_samples_list):
        return data_samples_list[0]


class _Model(BaseModel):
    def forward(self, inputs, data_samples=None, mode='tensor'):
        return inputs


def test_inner_model_looks_through_data_parallel_and_tta():
    model = _Model()
    wrapped = torch.nn.parallel.DataParallel(_TTA(module=model))
    assert inner_model(wrapped) is model and inner_model(model) is model


def test_tta_wraps_the_model_and_swaps_the_test_pipeline():
    cfg = load_config('fpn_convneur_m2_80k_ade20k.py')
    model = cfg.model
    enable_tta(cfg)
    assert cfg.model.type == 'SegTTAModel' and cfg.model.module == model
    assert cfg.test_dataloader.dataset.pipeline == cfg.tta_pipeline


@pytest.mark.parametrize('config', ['cascade_rcnn_convneur_m3_1x_coco.py',
                                    'cls_convneur_m1_300e_in1k.py'])
def test_tta_without_its_settings_is_a_clear_error(config):
    with pytest.raises(ValueError, match='--tta needs tta_model and tta_pipeline'):
        enable_tta(load_config(config))
