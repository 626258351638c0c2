"""Who trains a sweep's runs: one after another in this process (``teskd.sweep.run_sweep``), several processes
on this machine (:mod:`.local`), or Slurm jobs (:mod:`.slurm`). Every launcher runs the same command per run,
``teskd train CONFIG OVERRIDES --out RUN --resume RUN`` (``PlannedRun.command()``), so a run stopped under one
is resumed by any other; :mod:`.state` remembers which launcher last had each run, :mod:`.status` reports it."""
