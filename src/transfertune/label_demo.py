"""Deprecated spelling, kept for one release.

`python -m transfertune.label_demo` runs `python -m transfertune.family.label_demo`.
"""
if __name__ == "__main__":
    import runpy

    runpy.run_module("transfertune.family.label_demo", run_name="__main__", alter_sys=True)
