"""Trust and policy in front of the core: tokens and roles, licences, quotas, the extraction
guard, sensitive-data filters and the audit log, over one swappable state store."""
