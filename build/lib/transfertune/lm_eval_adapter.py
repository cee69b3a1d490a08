"""Deprecated spelling, kept for one release: `python -m transfertune.lm_eval_adapter` runs
`python -m transfertune.evaluation.lm_eval`."""
if __name__ == "__main__":
    import runpy

    runpy.run_module("transfertune.evaluation.lm_eval", run_name="__main__", alter_sys=True)
