"""Test helpers shared by several test modules (tiny random models built on the spot, never downloaded)."""
