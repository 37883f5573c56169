"""CRUD on departments, employees and tickets: shapes, defaults, refusals and conflicts."""

import pytest

CASES = {
    "departments": {
        "create": {"name": "Engineering"},
        "replace": {"name": "Platform"},
        "patch": {"name": "Operations"},
    },
    "employees": {
        "create": {"name": "Ada", "email": "ada@example.com", "title": "Engineer"},
        "replace": {"name": "Ada L", "email": "ada.l@example.com"},
        "patch": {"title": "Lead"},
    },
    "tickets": {
        "create": {"title": "Printer on fire", "priority": "critical"},
        "replace": {"title": "Printer fixed", "status": "resolved"},
        "patch": {"priority": "high"},
    },
}
RESOURCES = list(CASES)
SERVER_FIELDS = [
    ("departments", "id"),
    ("departments", "created_at"),
    ("employees", "id"),
    ("employees", "updated_at"),
    ("tickets", "id"),
    ("tickets", "created_at"),
    ("tickets", "updated_at"),
    ("tickets", "created_by"),
]


@pytest.mark.parametrize("resource", RESOURCES)
async def test_create_answers_201_with_location_and_server_fields(api, resource: str) -> None:
    """POST creates the row, answers it with a Location, a server id and timestamps."""
    response = await api.call("POST", f"/api/{resource}", json=CASES[resource]["create"])
    created = await response.json()
    assert response.status == 201
    assert response.headers["Location"] == f"/api/{resource}/{created['id']}"
    assert isinstance(created["id"], int)
    assert created["created_at"].endswith("Z")
    for name, value in CASES[resource]["create"].items():
        assert created[name] == value


@pytest.mark.parametrize("resource", RESOURCES)
async def test_get_answers_the_created_row(api, resource: str) -> None:
    """GET by id answers exactly what POST answered."""
    created = await api.create(resource, CASES[resource]["create"])
    assert await api.json("GET", f"/api/{resource}/{created['id']}", 200) == created


@pytest.mark.parametrize("resource", RESOURCES)
async def test_put_replaces_every_writable_field(api, resource: str) -> None:
    """PUT sets the fields sent and resets the others to their defaults."""
    created = await api.create(resource, CASES[resource]["create"])
    replacement = CASES[resource]["replace"]
    path = f"/api/{resource}/{created['id']}"
    replaced = await api.json("PUT", path, 200, json=replacement)
    for name, value in replacement.items():
        assert replaced[name] == value
    if resource == "employees":
        assert replaced["title"] is None
    if resource == "tickets":
        assert replaced["priority"] == "medium"
    assert await api.json("GET", path, 200) == replaced


@pytest.mark.parametrize("resource", RESOURCES)
async def test_patch_changes_only_the_fields_sent(api, resource: str) -> None:
    """PATCH leaves every field it was not given as it was."""
    created = await api.create(resource, CASES[resource]["create"])
    patch = CASES[resource]["patch"]
    patched = await api.json("PATCH", f"/api/{resource}/{created['id']}", 200, json=patch)
    expected = {**created, **patch}
    if "updated_at" in created:
        assert patched["updated_at"] >= created["updated_at"]
        expected["updated_at"] = patched["updated_at"]
    assert patched == expected


@pytest.mark.parametrize("resource", RESOURCES)
async def test_delete_is_204_then_404(api, resource: str) -> None:
    """DELETE removes the row; the row and a second DELETE are then 404."""
    created = await api.create(resource, CASES[resource]["create"])
    path = f"/api/{resource}/{created['id']}"
    await api.json("DELETE", path, 204)
    body = await api.json("GET", path, 404)
    assert body["reason_id"] == "upstream.not_found"
    await api.json("DELETE", path, 404)


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("row_id", ["999", "abc", "0", "99999999999999999999"])
async def test_absent_or_impossible_id_is_404(api, method: str, row_id: str) -> None:
    """An id no row can have is 404 upstream.not_found for every item method."""
    kwargs = {"json": CASES["tickets"]["replace"]} if method in {"PUT", "PATCH"} else {}
    body = await api.json(method, f"/api/tickets/{row_id}", 404, **kwargs)
    assert body["reason_id"] == "upstream.not_found"


async def test_ids_are_distinct_and_increasing(api) -> None:
    """Ids come from the table's sequence, never from the client."""
    ids = [(await api.create("tickets", {"title": f"t{n}"}))["id"] for n in range(3)]
    assert ids == sorted(set(ids))


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
@pytest.mark.parametrize(("resource", "field"), SERVER_FIELDS)
async def test_server_owned_field_in_body_is_400_naming_it(
    api, method: str, resource: str, field: str
) -> None:
    """A client may not set id, timestamps or created_by; the answer names the field."""
    created = await api.create(resource, CASES[resource]["create"])
    path = f"/api/{resource}" if method == "POST" else f"/api/{resource}/{created['id']}"
    body = {**CASES[resource]["create"], field: 12345}
    if resource == "employees" and method == "POST":
        body["email"] = "other@example.com"
    answer = await api.json(method, path, 400, json=body)
    assert answer["reason_id"] == "upstream.bad_request"
    assert f"'{field}'" in answer["error"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        pytest.param({"title": "x", "colour": "red"}, "colour", id="unknown field"),
        pytest.param({}, "title", id="missing required"),
        pytest.param({"title": 7}, "title", id="title not a string"),
        pytest.param({"title": "   "}, "title", id="blank title"),
        pytest.param({"title": "x" * 201}, "title", id="title too long"),
        pytest.param({"title": "x", "status": "done"}, "status", id="status not in enum"),
        pytest.param({"title": "x", "priority": None}, "priority", id="priority null"),
        pytest.param({"title": "x", "assignee_id": "1"}, "assignee_id", id="id as string"),
        pytest.param({"title": "x", "assignee_id": True}, "assignee_id", id="id as bool"),
        pytest.param({"title": "x", "assignee_id": 0}, "assignee_id", id="id zero"),
        pytest.param({"title": "x", "department_id": 1.5}, "department_id", id="id as float"),
        pytest.param(["title"], "JSON object", id="body is a list"),
    ],
)
async def test_bad_ticket_body_is_400_naming_the_field(api, body: object, named: str) -> None:
    """The service checks types, required fields and enums itself."""
    answer = await api.json("POST", "/api/tickets", 400, json=body)
    assert answer["reason_id"] == "upstream.bad_request"
    assert named in answer["error"]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{not json", id="malformed"),
        pytest.param(b'{"title": NaN}', id="NaN"),
        pytest.param(b"\xff\xfe", id="not utf-8"),
    ],
)
async def test_unparseable_body_is_400(api, raw: bytes) -> None:
    """A body that is not strict JSON is refused."""
    headers = {"Content-Type": "application/json"}
    answer = await api.json("POST", "/api/tickets", 400, data=raw, headers=headers)
    assert answer["reason_id"] == "upstream.bad_request"


async def test_non_json_content_type_is_415(api) -> None:
    """CRUD bodies must be application/json."""
    answer = await api.json(
        "POST", "/api/tickets", 415, data="title=x", headers={"Content-Type": "text/plain"}
    )
    assert answer["reason_id"] == "upstream.unsupported_media_type"


async def test_empty_patch_is_400(api) -> None:
    """A PATCH that changes nothing is refused rather than silently accepted."""
    created = await api.create("tickets", {"title": "x"})
    await api.json("PATCH", f"/api/tickets/{created['id']}", 400, json={})


async def test_bad_email_is_400(api) -> None:
    """An employee email must look like an address."""
    answer = await api.json("POST", "/api/employees", 400, json={"name": "A", "email": "nope"})
    assert "email" in answer["error"]


async def test_ticket_defaults_and_created_by_come_from_the_server(api, subject: str) -> None:
    """status and priority default; created_by is the gateway's subject."""
    created = await api.create("tickets", {"title": "x"})
    assert (created["status"], created["priority"], created["created_by"]) == (
        "open",
        "medium",
        subject,
    )


async def test_put_keeps_created_by(api, subject: str) -> None:
    """Replacing a ticket never changes who created it."""
    created = await api.create("tickets", {"title": "x"})
    other = {"X-Gateway-Subject": "mallory"}
    path = f"/api/tickets/{created['id']}"
    replaced = await api.json("PUT", path, 200, json={"title": "y"}, headers=other)
    assert replaced["created_by"] == subject


async def test_list_pages_by_limit_and_offset(api) -> None:
    """Listing is ordered by id; total counts the whole filtered set."""
    for n in range(7):
        await api.create("tickets", {"title": f"t{n}"})
    first = await api.json("GET", "/api/tickets?limit=3", 200)
    assert [item["title"] for item in first["items"]] == ["t0", "t1", "t2"]
    assert (first["total"], first["limit"], first["offset"]) == (7, 3, 0)
    last = await api.json("GET", "/api/tickets?limit=3&offset=6", 200)
    assert [item["title"] for item in last["items"]] == ["t6"]
    beyond = await api.json("GET", "/api/tickets?offset=10", 200)
    assert (beyond["items"], beyond["total"], beyond["limit"]) == ([], 7, 50)


async def test_ticket_filters_match_exactly(api) -> None:
    """Every whitelisted ticket filter narrows the list, and filters combine with AND."""
    department = await api.create("departments", {"name": "IT"})
    employee = await api.create("employees", {"name": "Bo", "email": "bo@example.com"})
    await api.create("tickets", {"title": "a", "priority": "high"})
    await api.create(
        "tickets",
        {
            "title": "b",
            "priority": "high",
            "status": "closed",
            "department_id": department["id"],
            "assignee_id": employee["id"],
        },
    )
    await api.call(
        "POST", "/api/tickets", json={"title": "c"}, headers={"X-Gateway-Subject": "bob"}
    )
    queries = {
        "status=closed": ["b"],
        "priority=high": ["a", "b"],
        f"department_id={department['id']}": ["b"],
        f"assignee_id={employee['id']}": ["b"],
        "created_by=bob": ["c"],
        "priority=high&status=open": ["a"],
    }
    for query, titles in queries.items():
        page = await api.json("GET", f"/api/tickets?{query}", 200)
        assert [item["title"] for item in page["items"]] == titles, query
        assert page["total"] == len(titles)


async def test_employee_and_department_filters_match_exactly(api) -> None:
    """department_id, email and manager_id filter employees; name filters departments."""
    department = await api.create("departments", {"name": "HR"})
    await api.create("departments", {"name": "Sales"})
    boss = await api.create(
        "employees",
        {"name": "Boss", "email": "boss@example.com", "department_id": department["id"]},
    )
    await api.create(
        "employees", {"name": "Al", "email": "al@example.com", "manager_id": boss["id"]}
    )
    queries = {
        f"/api/employees?department_id={department['id']}": ["Boss"],
        "/api/employees?email=al@example.com": ["Al"],
        f"/api/employees?manager_id={boss['id']}": ["Al"],
        "/api/departments?name=Sales": ["Sales"],
    }
    for path, names in queries.items():
        page = await api.json("GET", path, 200)
        assert [item["name"] for item in page["items"]] == names, path


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("limit=0", id="limit zero"),
        pytest.param("limit=501", id="limit above max"),
        pytest.param("limit=abc", id="limit not a number"),
        pytest.param("offset=-1", id="negative offset"),
        pytest.param("title=x", id="column not whitelisted"),
        pytest.param("status=done", id="status not in enum"),
        pytest.param("department_id=abc", id="id filter not a number"),
        pytest.param("status=open&status=closed", id="repeated filter"),
    ],
)
async def test_bad_list_parameters_are_400(api, query: str) -> None:
    """Only whitelisted, well-typed filters and sane paging are accepted."""
    answer = await api.json("GET", f"/api/tickets?{query}", 400)
    assert answer["reason_id"] == "upstream.bad_request"


@pytest.mark.parametrize(
    ("resource", "first", "second"),
    [
        pytest.param("departments", {"name": "IT"}, {"name": "IT"}, id="duplicate name"),
        pytest.param(
            "employees",
            {"name": "A", "email": "a@example.com"},
            {"name": "B", "email": "a@example.com"},
            id="duplicate email",
        ),
    ],
)
async def test_duplicate_unique_value_is_409(api, resource: str, first, second) -> None:
    """Creating a second row with a taken unique value is 409 upstream.conflict."""
    await api.create(resource, first)
    answer = await api.json("POST", f"/api/{resource}", 409, json=second)
    assert answer["reason_id"] == "upstream.conflict"


async def test_patch_to_a_taken_email_is_409(api) -> None:
    """Uniqueness holds on update too."""
    await api.create("employees", {"name": "A", "email": "a@example.com"})
    other = await api.create("employees", {"name": "B", "email": "b@example.com"})
    path = f"/api/employees/{other['id']}"
    await api.json("PATCH", path, 409, json={"email": "a@example.com"})


@pytest.mark.parametrize(
    ("resource", "body"),
    [
        pytest.param("tickets", {"title": "x", "department_id": 404}, id="ticket department"),
        pytest.param("tickets", {"title": "x", "assignee_id": 404}, id="ticket assignee"),
        pytest.param(
            "employees", {"name": "A", "email": "a@x.io", "manager_id": 404}, id="manager"
        ),
    ],
)
async def test_reference_to_a_missing_row_is_409(api, resource: str, body) -> None:
    """A department_id, assignee_id or manager_id must name an existing row."""
    answer = await api.json("POST", f"/api/{resource}", 409, json=body)
    assert answer["reason_id"] == "upstream.conflict"
    assert "404" in answer["error"]


async def test_deleting_a_referenced_row_is_409_until_released(api) -> None:
    """A department or employee still referenced cannot be deleted."""
    department = await api.create("departments", {"name": "IT"})
    employee = await api.create(
        "employees", {"name": "A", "email": "a@example.com", "department_id": department["id"]}
    )
    ticket = await api.create("tickets", {"title": "x", "assignee_id": employee["id"]})
    await api.json("DELETE", f"/api/departments/{department['id']}", 409)
    await api.json("DELETE", f"/api/employees/{employee['id']}", 409)
    await api.json("PATCH", f"/api/tickets/{ticket['id']}", 200, json={"assignee_id": None})
    await api.json("DELETE", f"/api/employees/{employee['id']}", 204)
    await api.json("DELETE", f"/api/departments/{department['id']}", 204)


async def test_referenced_rows_can_still_be_updated(api) -> None:
    """Renaming a department with employees works (DuckDB foreign keys would refuse it)."""
    department = await api.create("departments", {"name": "IT"})
    manager = await api.create("employees", {"name": "M", "email": "m@example.com"})
    await api.create(
        "employees",
        {
            "name": "A",
            "email": "a@example.com",
            "department_id": department["id"],
            "manager_id": manager["id"],
        },
    )
    await api.json("PUT", f"/api/departments/{department['id']}", 200, json={"name": "Ops"})
    patch = {"email": "m2@example.com"}
    await api.json("PATCH", f"/api/employees/{manager['id']}", 200, json=patch)
