"""The user's side: `ParjobsClient` over the broker, and the seed page's `JobSheet`."""
