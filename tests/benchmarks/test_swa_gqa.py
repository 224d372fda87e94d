"""benchmarks/kernels/swa_gqa.py's variant names: what each one forces in the column kernels."""
from benchmarks.kernels import swa_gqa
from ttt_e2e.kernels.swa import common


def test_variant_knobs():
    assert swa_gqa.variant_knobs("gqa") == ("gqa", "rule", None)
    assert swa_gqa.variant_knobs("gqa-p2") == ("gqa", "2", None)
    assert swa_gqa.variant_knobs("gqa-p4-head") == ("gqa", "4", "head")
    assert swa_gqa.variant_knobs("mha-head") == ("mha", "rule", "head")
    assert swa_gqa.variant_knobs("repeat-tile") == ("repeat", "rule", "tile")


def test_forced_knobs_apply_inside_the_call_only():
    """Inside the call the knobs are forced; after it, what was set before is back."""
    before = common.GROUP_PARTS_OVERRIDE, common.COLUMN_ORDER
    seen = []
    knobs = lambda: seen.append((common.GROUP_PARTS_OVERRIDE, common.COLUMN_ORDER))  # noqa: E731
    swa_gqa.forced_parts(knobs, "2", "head")()
    swa_gqa.forced_parts(knobs, "rule", "head")()
    swa_gqa.forced_parts(knobs, "4")()
    assert seen == [(2, "head"), (before[0], "head"), (4, before[1])]
    assert (common.GROUP_PARTS_OVERRIDE, common.COLUMN_ORDER) == before
    assert swa_gqa.forced_parts(len, "rule") is len
