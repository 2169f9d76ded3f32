"""The frozen backbone and what runs on it: encoding (templates, rows, batches), heads, deep prefixes, PromptModel and its one loss."""
