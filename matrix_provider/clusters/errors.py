"""The one error a cluster command raises: its message names the cause, the job id and the fix."""


class ClusterError(RuntimeError):
    pass
