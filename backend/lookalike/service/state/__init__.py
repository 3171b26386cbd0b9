"""Per-project state in Redis, split by concern; `ProjectState` composes the parts."""

from lookalike.service.state.failures import Failure
from lookalike.service.state.meta import ModelConflictError
from lookalike.service.state.project import ProjectState, known_projects
from lookalike.service.state.vectors import ChangeLogTrimmedError

__all__ = [
    "ChangeLogTrimmedError",
    "Failure",
    "ModelConflictError",
    "ProjectState",
    "known_projects",
]
