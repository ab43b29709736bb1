"""Synthetic document generators (invoices, receipts, small forms) with JSON targets."""
