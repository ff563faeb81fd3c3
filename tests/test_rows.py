"""Batch surgery on the host's tensors and SDXL dict conds, for every WebUI version's DictWithShape."""

import torch

from lib_pag.rows import perturbed_mask, row_offset, twin_rows


class DictWithShape17(dict):
    """A1111 1.7/1.8 ``prompt_parser.DictWithShape``: the shape is given to ``__init__`` and stored."""

    def __init__(self, x, shape):
        super().__init__()
        self.update(x)
        self.shape = shape


class DictWithShape110(dict):
    """A1111 1.9+ ``prompt_parser.DictWithShape``: the shape is read from the crossattn rows."""

    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def test_twin_rows_layout():
    x = torch.arange(5.0).reshape(5, 1)  # 3 cond rows, 2 uncond rows
    out = twin_rows(x, 3)
    assert out.reshape(-1).tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert perturbed_mask(3, 2).tolist() == [False] * 3 + [True] * 3 + [False] * 2
    assert twin_rows(None, 3) is None


def test_sdxl_dict_conds_keep_their_class_and_shape():
    for cls in (DictWithShape17, DictWithShape110):
        cond = {"crossattn": torch.randn(2, 4, 8), "vector": torch.randn(2, 6)}
        t = cls(cond, cond["crossattn"].shape) if cls is DictWithShape17 else cls(cond)
        out = twin_rows(t, 2)
        assert type(out) is cls
        assert out.shape == (4, 4, 8)
        assert torch.equal(out["vector"][2:], cond["vector"])


def test_row_offset_finds_slices_and_rejects_copies():
    base = torch.randn(6, 4, 2, 2)
    assert row_offset(base, base) == 0
    assert row_offset(base[2:5], base) == 2
    assert row_offset(base[:-2], base) == 0
    assert row_offset(base[2:5].clone(), base) is None
    assert row_offset(base[:, :2], base) is None
