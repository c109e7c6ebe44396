"""Planning a cluster offline: TorchRec's planner on `meta` tables for a described cluster
(`plan_sim`), behind ``tf4ctr plan``. Nothing here needs GPUs or a process group."""
