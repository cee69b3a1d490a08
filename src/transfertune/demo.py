"""Deprecated spelling, kept for one release.

`python -m transfertune.demo` runs `python -m transfertune.family.demo`.
"""
if __name__ == "__main__":
    import runpy

    runpy.run_module("transfertune.family.demo", run_name="__main__", alter_sys=True)
