"""The harness: sweep presets and specs, worker and driver, executors, tracking, metrics, reports."""
