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
    seen = []
    run = swa_gqa.forced_parts(lambda: seen.append((common.GROUP_PARTS_OVERRIDE, common.COLUMN_ORDER_OVERRIDE)),
                               "2", "head")
    run()
    assert seen == [(2, "head")]
    assert (common.GROUP_PARTS_OVERRIDE, common.COLUMN_ORDER_OVERRIDE) == (None, None)
    assert swa_gqa.forced_parts(len, "rule") is len
