"""scripts/design_study.py's bookkeeping: seeds aggregate to mean ± sd, the dev sweep picks each method's rate."""
import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "design_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("design_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_aggregate_to_mean_and_sample_sd(study):
    rows = [{"variant": "v", "column": "c", "beta": 1.0, "exact_match": x} for x in (0.9, 0.8, 0.7)]
    mean, sd = study.aggregate(rows, "exact_match", variant="v", column="c", beta=1.0)
    assert mean == pytest.approx(0.8) and sd == pytest.approx(0.1)
    assert study.aggregate(rows, "exact_match", variant="other") is None
    assert study.mean_spread([0.5]) == (0.5, 0.0)
    assert study.mean_spread([0.1, math.inf]) == (math.inf, math.inf)


def test_dev_sweep_picks_best_exact_match_then_lowest_nll(study):
    rows = [{"method": "a", "lr": 1e-3, "exact_match": 0.9, "nll": 0.2},
            {"method": "a", "lr": 2e-3, "exact_match": 0.9, "nll": 0.1},
            {"method": "a", "lr": 5e-3, "exact_match": 0.5, "nll": 0.05},
            {"method": "b", "lr": 1e-4, "exact_match": 0.7, "nll": 0.3}]
    assert study.best_rates(rows) == {"a": 2e-3, "b": 1e-4}


def test_design_table_has_a_row_per_variant_and_a_beta_table(study):
    rows = [{"variant": n, "seed": s, "column": c, "beta": 1.0, "exact_match": 0.5 + 0.1 * s, "nll": 0.1}
            for n in ("residual (default)", "cascade") for s in (0, 1) for c, _, _ in study.COLUMNS]
    rows += [{"variant": "residual (default)", "seed": 0, "column": c, "beta": b, "exact_match": 0.4, "nll": 0.2}
             for b in (0.5, 2.0) for c, _, _ in study.COLUMNS]
    table = study.design_table({"variants": {"residual (default)": {}, "cascade": {}}, "rows": rows})
    assert "| cascade | 0.550 ± 0.071 |" in table
    assert "| 0.5 | 0.400 ± 0.000 |" in table
