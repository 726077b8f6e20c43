"""Running many edits.

- ``plan``        a sweep's config (the YAML schema), grid and point keys
- ``store``       a sweep's results store: one atomically written file per point
- ``runner``      the worker: the model and shared references, one unit of points at a time
- ``executors``   where units run: here, or on Ray actors
- ``sweep``       run_sweep: plan, execute, store, summarize
- ``evaluation``  an editor on many requests: metrics before and after, one table
- ``claims``      the claims report: STEAM's claims on public data, paired, with verdicts
"""
