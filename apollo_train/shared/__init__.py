"""What both processes share: settings, the wire, the request schema, the weight-handles file."""
