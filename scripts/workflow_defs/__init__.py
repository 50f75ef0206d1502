"""One module per area; each defines WORKFLOWS = {file name: function returning the UI-format dict}."""
