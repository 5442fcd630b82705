"""Serving many requests on one model: the scheduler that owns each request, and the runner seam."""

from .request import (FRESH, GIVEN, HIT, REBUILT, Progress, Reply, Request, RequestFailed, SchedulerBusy,
                      SchedulerClosed)
from .runner import BatchedRunner, Runner, ZeroGpuRunner
from .scheduler import Scheduler

__all__ = ["FRESH", "GIVEN", "HIT", "REBUILT", "BatchedRunner", "Progress", "Reply", "Request",
           "RequestFailed", "Runner", "Scheduler", "SchedulerBusy", "SchedulerClosed", "ZeroGpuRunner"]
