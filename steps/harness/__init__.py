"""The main job around the ladder: the benchmark, its one timer, the report that turns
committed results into tables and plots, the command line, and the notebooks' helpers."""
