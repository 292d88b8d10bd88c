"""create_fp_model / create_model: unknown names get difflib suggestions over the registered timm names."""

from __future__ import annotations

import pytest

from lightning_dbq.quant.factory import close_model_names, create_fp_model


def test_typo_suggests_the_registered_name() -> None:
    assert close_model_names("mobilenetv3_smal_100")[0] == "mobilenetv3_small_100"
    assert close_model_names("cifar_resnt20")[0] == "cifar_resnet20"  # lightning_dbq's own models are candidates
    with pytest.raises(
        ValueError, match=r"unknown model name 'mobilenetv3_smal_100'; did you mean 'mobilenetv3_small_100'\?"
    ):
        create_fp_model("mobilenetv3_smal_100", num_classes=10)


def test_no_close_name_points_at_the_list() -> None:
    assert close_model_names("zzzz") == []
    with pytest.raises(ValueError, match=r"unknown model name 'zzzz'; see timm.list_models\(\)"):
        create_fp_model("zzzz")
