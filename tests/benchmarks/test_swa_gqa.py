"""benchmarks/kernels/swa_gqa.py's variant names: what each one forces in the column kernels."""
from benchmarks.kernels import swa_gqa
from ttt_e2e.kernels.swa import common


def test_variant_knobs():
    assert swa_gqa.variant_knobs("gqa") == ("gqa", "rule", None, None)
    assert swa_gqa.variant_knobs("gqa-p2") == ("gqa", "2", None, None)
    assert swa_gqa.variant_knobs("gqa-p4-head") == ("gqa", "4", "head", None)
    assert swa_gqa.variant_knobs("mha-head") == ("mha", "rule", "head", None)
    assert swa_gqa.variant_knobs("repeat-tile") == ("repeat", "rule", "tile", None)
    assert swa_gqa.variant_knobs("gqa-p2-flat") == ("gqa", "2", None, "flat")


def test_forced_knobs_apply_inside_the_call_only():
    """Inside the call the knobs are forced; after it, what was set before is back."""
    before = common.GROUP_PARTS_OVERRIDE, common.COLUMN_ORDER, common.COLUMN_LOOP
    seen = []
    knobs = lambda: seen.append((common.GROUP_PARTS_OVERRIDE, common.COLUMN_ORDER, common.COLUMN_LOOP))  # noqa: E731
    swa_gqa.forced_parts(knobs, "2", "head")()
    swa_gqa.forced_parts(knobs, "rule", "head")()
    swa_gqa.forced_parts(knobs, "rule", loop="flat")()
    assert seen == [(2, "head", before[2]), (before[0], "head", before[2]), (before[0], before[1], "flat")]
    assert (common.GROUP_PARTS_OVERRIDE, common.COLUMN_ORDER, common.COLUMN_LOOP) == before
    assert swa_gqa.forced_parts(len, "rule") is len
