"""The admin console: server-rendered pages under /console, governed by policy like any route.

Every value shown comes from data someone else wrote (tickets, audit details, stream records):
it is escaped, or sanitised where a field allows markup. The console never reads a secret's
value and never runs a script that the page's nonce did not allow.
"""
