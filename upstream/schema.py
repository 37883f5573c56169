"""The three CRUD resources described as data: columns, rules, filters and references.

Routes, validation and SQL are all derived from these specs; column names used in SQL
must never come from anywhere else.
"""

import re
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """How a column's JSON value is checked."""

    ID = "id"
    TEXT = "text"
    EMAIL = "email"
    CHOICE = "choice"
    TIMESTAMP = "timestamp"


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a resource and the rules for writing it."""

    name: str
    kind: Kind
    writable: bool = True
    required: bool = False
    choices: tuple[str, ...] = ()
    default: str | None = None
    max_length: int = 200
    references: str | None = None
    unique: bool = False


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """A table exposed as ``/api/{name}``."""

    name: str
    singular: str
    columns: tuple[Column, ...]
    filters: tuple[str, ...]
    has_updated_at: bool
    has_created_by: bool

    @property
    def column_names(self) -> tuple[str, ...]:
        """Every column, in the order answers list them."""
        return tuple(column.name for column in self.columns)

    @property
    def writable(self) -> tuple[Column, ...]:
        """Columns a client may set."""
        return tuple(column for column in self.columns if column.writable)

    def column(self, name: str) -> Column | None:
        """The column called ``name``, if the resource has one."""
        for column in self.columns:
            if column.name == name:
                return column
        return None


EMAIL_SHAPE = re.compile(r"^[^@\s]+@[^@\s]+$")
MAX_ID = 2**63 - 1  # BIGINT

_ID = Column("id", Kind.ID, writable=False)
_CREATED_AT = Column("created_at", Kind.TIMESTAMP, writable=False)
_UPDATED_AT = Column("updated_at", Kind.TIMESTAMP, writable=False)

DEPARTMENTS = ResourceSpec(
    name="departments",
    singular="department",
    columns=(
        _ID,
        Column("name", Kind.TEXT, required=True, unique=True),
        _CREATED_AT,
    ),
    filters=("name",),
    has_updated_at=False,
    has_created_by=False,
)

EMPLOYEES = ResourceSpec(
    name="employees",
    singular="employee",
    columns=(
        _ID,
        Column("name", Kind.TEXT, required=True),
        Column("email", Kind.EMAIL, required=True, max_length=320, unique=True),
        Column("department_id", Kind.ID, references="departments"),
        Column("title", Kind.TEXT),
        Column("manager_id", Kind.ID, references="employees"),
        _CREATED_AT,
        _UPDATED_AT,
    ),
    filters=("department_id", "email", "manager_id"),
    has_updated_at=True,
    has_created_by=False,
)

TICKETS = ResourceSpec(
    name="tickets",
    singular="ticket",
    columns=(
        _ID,
        Column("title", Kind.TEXT, required=True),
        Column("description", Kind.TEXT, max_length=10_000),
        Column(
            "status",
            Kind.CHOICE,
            choices=("open", "in_progress", "resolved", "closed"),
            default="open",
        ),
        Column(
            "priority",
            Kind.CHOICE,
            choices=("low", "medium", "high", "critical"),
            default="medium",
        ),
        Column("department_id", Kind.ID, references="departments"),
        Column("assignee_id", Kind.ID, references="employees"),
        Column("created_by", Kind.TEXT, writable=False),
        _CREATED_AT,
        _UPDATED_AT,
    ),
    filters=("status", "priority", "department_id", "assignee_id", "created_by"),
    has_updated_at=True,
    has_created_by=True,
)

RESOURCES: tuple[ResourceSpec, ...] = (DEPARTMENTS, EMPLOYEES, TICKETS)
RESOURCES_BY_NAME = {spec.name: spec for spec in RESOURCES}


def referrers_of(target: str) -> list[tuple[ResourceSpec, Column]]:
    """Every (resource, column) that points at rows of ``target``."""
    return [
        (spec, column)
        for spec in RESOURCES
        for column in spec.columns
        if column.references == target
    ]
