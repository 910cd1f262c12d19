"""Ray glue: one thin entry point per stage (`python -m ray_jobs.<stage>`) plus `pipeline`."""
