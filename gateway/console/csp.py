"""The console's Content-Security-Policy: a fresh nonce per page, enforced or report-only.

Scripts and styles run only with the page's nonce (never 'unsafe-inline'): markup that slipped
past escaping still cannot run. Report-only mode keeps an enforced baseline (no framing, no
<base>, no plugins, forms only to this origin) and reports the rest of the policy.
"""

from __future__ import annotations

import secrets
from typing import Literal

REPORT_PATH = "/console/csp-report"
REPORT_GROUP = "console-csp"  # the Reporting API endpoint name (Reporting-Endpoints header)

# Directive names a report may count under (the metric's `directive` label): a closed set, so a
# forged report cannot add a series. Anything else is counted as "other".
DIRECTIVES = frozenset(
    {
        "default-src", "script-src", "script-src-elem", "script-src-attr", "style-src",
        "style-src-elem", "style-src-attr", "img-src", "connect-src", "font-src", "media-src",
        "object-src", "frame-src", "child-src", "worker-src", "manifest-src", "form-action",
        "frame-ancestors", "base-uri", "trusted-types", "require-trusted-types-for",
    }
)  # fmt: skip

# What the baseline keeps enforced in report-only mode: none of it can break a page of ours.
_BASELINE = "frame-ancestors 'none'; base-uri 'none'; object-src 'none'; form-action 'self'"


def new_nonce() -> str:
    """128 random bits, base64url: unguessable, so an injected <script> cannot carry it."""
    return secrets.token_urlsafe(16)


class ContentSecurityPolicy:
    """The console's CSP headers for one nonce, in the configured mode."""

    def __init__(self, mode: Literal["enforce", "report-only"]) -> None:
        self.mode = mode

    @staticmethod
    def policy(nonce: str) -> str:
        """The whole policy: nothing by default, our nonce'd scripts and styles, ourselves."""
        return (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
            f"base-uri 'none'; object-src 'none'; report-uri {REPORT_PATH}; "
            f"report-to {REPORT_GROUP}"
        )

    def headers(self, nonce: str) -> dict[str, str]:
        """The CSP header(s), and where a browser sends its reports."""
        headers = {"Reporting-Endpoints": f'{REPORT_GROUP}="{REPORT_PATH}"'}
        if self.mode == "enforce":
            headers["Content-Security-Policy"] = self.policy(nonce)
        else:
            headers["Content-Security-Policy"] = _BASELINE
            headers["Content-Security-Policy-Report-Only"] = self.policy(nonce)
        return headers
