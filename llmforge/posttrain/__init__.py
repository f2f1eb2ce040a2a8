"""After pre-training: SFT and DPO tasks, their data and losses."""
