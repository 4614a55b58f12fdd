"""The harness: configuration and presets, sweeps, runner, executors, tracking, metrics, reports."""
