"""Too few images for a metric is refused before sampling, not after (found by benchmarks/real_scale.py)."""

from __future__ import annotations

import pytest

from metrics.api import check_image_count, minimum_images
from utils.errors import UsageError


def test_minimum_per_metric():
    assert minimum_images(["fid"]) == 2
    assert minimum_images(["fid", "pr_inception"]) == 4
    assert minimum_images(["fid", "fd_dinov2", "is"]) == 10
    check_image_count(["fid", "is"], 10)
    with pytest.raises(UsageError, match="at least 10 images, the run makes 9"):
        check_image_count(["fid", "is"], 9)


def test_edm2_config_refuses_is_with_two_seeds(tmp_path):
    from sampling.edm2_run import build_config

    with pytest.raises(UsageError, match="at least 10 images"):
        build_config(net_pos_pkl=str(tmp_path / "net.pkl"), outdir=str(tmp_path / "out"), seeds="0-1",
                     metrics="fid,is", ref_path=str(tmp_path / "ref.pkl"))
    assert not (tmp_path / "out").exists()


def test_dit_config_refuses_is_with_two_seeds(tmp_path):
    from sampling.dit_run import build_config

    with pytest.raises(UsageError, match="at least 10 images"):
        build_config(ckpt=str(tmp_path / "dit.pt"), seeds="0-1", metrics="is", sample_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
