"""The built-in identity provider: accounts, passwords, tokens, sessions, MFA."""
