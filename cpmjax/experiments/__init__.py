"""Experiments: ablation studies (study, runner, backends, report), muP sweeps, the
ScalingBench-style indicator and UltraClean-style data filtering."""
