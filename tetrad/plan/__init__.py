"""Rehearse a run before spending a cluster on it: the dry run of any layout on one CPU
process, the per-rank memory estimate, and the layout planner, each on the real model, mesh and
parallelize code under torch's fake process group."""
