"""The built-in model family (mini-s < mini-m < mini-l, -v2 siblings, mini-x): its fictional world, probes, the
demo and the label demo. Not imported by the library; its models and tasks are package data (io.locations)."""
