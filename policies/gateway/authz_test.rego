# Tests of gateway.authz, run by `gateway policy test` (and by `make test`).
#
# rego-cpp 1.5.2 (regopy) aborts the process on `with input as {...}` when the policy has helper
# rules; replacing input.subject and input.route separately works, so every test does that.
# It also mis-evaluates a `with` whose value is a constant rule of this package, so every `with`
# value here is a literal or a function call. Every role, route and method is also checked
# through policies/matrix.toml.
package gateway.authz_test

import rego.v1

_subject(roles) := {"sub": "alice", "roles": roles}

_route(resource, action) := {"name": "test", "resource": resource, "action": action}

test_allow_reader_reads_tickets if {
	data.gateway.authz.decision.allow with input.subject as _subject(["reader"])
		with input.route as _route("tickets", "read")
}

test_deny_reader_creates_ticket if {
	d := data.gateway.authz.decision with input.subject as _subject(["reader"])
		with input.route as _route("tickets", "create")
	not d.allow
	"rbac.action_not_granted" in d.reasons
}

test_deny_reader_deletes_employee if {
	not data.gateway.authz.allow with input.subject as _subject(["reader"])
		with input.route as _route("employees", "delete")
}

test_allow_admin_creates_ticket if {
	data.gateway.authz.allow with input.subject as _subject(["admin"])
		with input.route as _route("tickets", "create")
}

test_allow_admin_deletes_department if {
	data.gateway.authz.allow with input.subject as _subject(["admin"])
		with input.route as _route("departments", "delete")
}

test_allow_ingest_process_writes_stream if {
	data.gateway.authz.allow with input.subject as _subject(["ingest_process"])
		with input.route as _route("ingest", "write")
}

test_deny_ingest_process_reads_employees if {
	not data.gateway.authz.allow with input.subject as _subject(["ingest_process"])
		with input.route as _route("employees", "read")
}

test_deny_reader_writes_stream if {
	not data.gateway.authz.allow with input.subject as _subject(["reader"])
		with input.route as _route("ingest", "write")
}

test_allow_any_granting_role_among_several if {
	data.gateway.authz.allow with input.subject as _subject(["unknown", "reader"])
		with input.route as _route("tickets", "read")
}

test_deny_unknown_role if {
	d := data.gateway.authz.decision with input.subject as _subject(["superuser"])
		with input.route as _route("tickets", "read")
	not d.allow
	"rbac.no_known_role" in d.reasons
}

test_deny_no_roles if {
	not data.gateway.authz.allow with input.subject as _subject([])
		with input.route as _route("tickets", "read")
}

test_deny_missing_subject if {
	d := data.gateway.authz.decision with input.subject as {}
		with input.route as _route("tickets", "read")
	not d.allow
	"rbac.no_subject" in d.reasons
}

test_deny_empty_subject_name if {
	not data.gateway.authz.allow with input.subject as {"sub": "", "roles": ["admin"]}
		with input.route as _route("tickets", "read")
}

test_deny_missing_route if {
	not data.gateway.authz.allow with input.subject as _subject(["admin"])
		with input.route as {}
}

test_allow_admin_reviews_quarantine_in_console if {
	data.gateway.authz.decision.allow with input.subject as _subject(["admin"])
		with input.route as _route("console", "review")
}

test_deny_data_steward_opens_console if {
	d := data.gateway.authz.decision with input.subject as _subject(["data_steward"])
		with input.route as _route("console", "read")
	d.reasons == {"rbac.action_not_granted"}
}

test_deny_unknown_resource if {
	not data.gateway.authz.allow with input.subject as _subject(["admin"])
		with input.route as _route("audit_internals", "read")
}

test_deny_roles_not_a_list if {
	not data.gateway.authz.allow with input.subject as {"sub": "alice", "roles": "admin"}
		with input.route as _route("tickets", "read")
}

test_decision_shape_on_allow if {
	d := data.gateway.authz.decision with input.subject as _subject(["admin"])
		with input.route as _route("tickets", "read")
	d.allow == true
	count(d.reasons) == 0
}

# data.mfa.required as a function of the test: a constant rule (`_x := {...}`) given to `with`
# is mis-evaluated by rego-cpp 1.5.2 (ignored, or the subject read as missing); function calls
# and literals are not.
_mfa_required(resource, action) := {resource: [action]}

_login(roles, amr) := {"sub": "root", "roles": roles, "amr": amr}

test_deny_admin_delete_without_mfa_when_required if {
	d := data.gateway.authz.decision with input.subject as _login(["admin"], ["pwd"])
		with input.route as _route("departments", "delete")
		with data.mfa.required as _mfa_required("departments", "delete")
	not d.allow
	d.reasons == {"mfa.required"}
}

test_allow_admin_delete_with_mfa_when_required if {
	data.gateway.authz.allow with input.subject as _login(["admin"], ["pwd", "otp", "mfa"])
		with input.route as _route("departments", "delete")
		with data.mfa.required as _mfa_required("departments", "delete")
}

test_allow_admin_read_without_mfa_when_only_deletes_require_it if {
	data.gateway.authz.allow with input.subject as _login(["admin"], ["pwd"])
		with input.route as _route("departments", "read")
		with data.mfa.required as _mfa_required("departments", "delete")
}

test_deny_reader_delete_names_the_grant_not_mfa if {
	d := data.gateway.authz.decision with input.subject as _login(["reader"], ["pwd"])
		with input.route as _route("departments", "delete")
		with data.mfa.required as _mfa_required("departments", "delete")
	d.reasons == {"rbac.action_not_granted"}
}

# support_agent: works the ticket queue.

test_allow_support_agent_updates_ticket if {
	data.gateway.authz.allow with input.subject as _subject(["support_agent"])
		with input.route as _route("tickets", "update")
}

test_allow_support_agent_creates_ticket if {
	data.gateway.authz.allow with input.subject as _subject(["support_agent"])
		with input.route as _route("tickets", "create")
}

test_allow_support_agent_reads_employees if {
	data.gateway.authz.allow with input.subject as _subject(["support_agent"])
		with input.route as _route("employees", "read")
}

test_deny_support_agent_deletes_ticket if {
	d := data.gateway.authz.decision with input.subject as _subject(["support_agent"])
		with input.route as _route("tickets", "delete")
	not d.allow
	d.reasons == {"rbac.action_not_granted"}
}

test_deny_support_agent_updates_employee if {
	not data.gateway.authz.allow with input.subject as _subject(["support_agent"])
		with input.route as _route("employees", "update")
}

# manager: the attribute rule. Employees only as a listing filtered to the department in the
# token's department_id claim.

_manager(department) := {"sub": "maria", "roles": ["manager"], "claims": {"department_id": department}}

_listing(resource, action) := {"name": "test", "resource": resource, "action": action, "params": {}}

_filtered(departments) := {"method": "GET", "query": {"department_id": departments}}

test_allow_manager_lists_own_department_employees if {
	data.gateway.authz.allow with input.subject as _manager(3)
		with input.route as _listing("employees", "read")
		with input.request as _filtered(["3"])
}

test_allow_manager_with_string_department_claim if {
	data.gateway.authz.allow with input.subject as _manager("3")
		with input.route as _listing("employees", "read")
		with input.request as _filtered(["3"])
}

test_deny_manager_lists_all_employees if {
	d := data.gateway.authz.decision with input.subject as _manager(3)
		with input.route as _listing("employees", "read")
		with input.request as {"method": "GET", "query": {}}
	not d.allow
	d.reasons == {"rbac.not_own_department"}
}

test_deny_manager_lists_other_department if {
	d := data.gateway.authz.decision with input.subject as _manager(3)
		with input.route as _listing("employees", "read")
		with input.request as _filtered(["4"])
	not d.allow
	d.reasons == {"rbac.not_own_department"}
}

test_deny_manager_repeats_department_filter if {
	not data.gateway.authz.allow with input.subject as _manager(3)
		with input.route as _listing("employees", "read")
		with input.request as _filtered(["3", "4"])
}

test_deny_manager_reads_one_employee_with_own_filter if {
	not data.gateway.authz.allow with input.subject as _manager(3)
		with input.route as {"name": "test", "resource": "employees", "action": "read", "params": {"id": "42"}}
		with input.request as _filtered(["3"])
}

test_deny_manager_without_department_claim if {
	d := data.gateway.authz.decision with input.subject as {"sub": "maria", "roles": ["manager"]}
		with input.route as _listing("employees", "read")
		with input.request as _filtered(["3"])
	not d.allow
	d.reasons == {"rbac.not_own_department"}
}

test_deny_manager_with_fractional_department_claim if {
	not data.gateway.authz.allow with input.subject as _manager(3.5)
		with input.route as _listing("employees", "read")
		with input.request as _filtered(["3"])
}

test_deny_manager_lists_own_department_tickets if {
	d := data.gateway.authz.decision with input.subject as _manager(3)
		with input.route as _listing("tickets", "read")
		with input.request as _filtered(["3"])
	not d.allow
	d.reasons == {"rbac.action_not_granted"}
}

test_deny_manager_updates_own_department_employees if {
	not data.gateway.authz.allow with input.subject as _manager(3)
		with input.route as _listing("employees", "update")
		with input.request as _filtered(["3"])
}

test_allow_manager_with_mfa_when_required if {
	data.gateway.authz.allow with input.subject as object.union(_manager(3), {"amr": ["pwd", "mfa"]})
		with input.route as _listing("employees", "read")
		with input.request as _filtered(["3"])
		with data.mfa.required as _mfa_required("employees", "read")
}

test_deny_manager_without_mfa_when_required if {
	d := data.gateway.authz.decision with input.subject as object.union(_manager(3), {"amr": ["pwd"]})
		with input.route as _listing("employees", "read")
		with input.request as _filtered(["3"])
		with data.mfa.required as _mfa_required("employees", "read")
	not d.allow
	d.reasons == {"mfa.required"}
}
