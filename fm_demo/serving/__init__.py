"""Serving many conversations on one model: the batched scheduler and the runner seam."""

from .runner import BatchedRunner, ReplyStream, Runner, ZeroGpuRunner
from .scheduler import Progress, ReplyHandle, Scheduler, SchedulerBusy, SchedulerClosed

__all__ = ["BatchedRunner", "Progress", "ReplyHandle", "ReplyStream", "Runner", "Scheduler", "SchedulerBusy",
           "SchedulerClosed", "ZeroGpuRunner"]
