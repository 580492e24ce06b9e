"""What every training stage shares around its loop: run dirs, atomic checkpoints and exact
resume, the optimizer-step loop and its parts (optimizer and schedule, data order, the state
a checkpoint holds), torch.distributed, and the fault-injection hooks the crash tests use.
"""
