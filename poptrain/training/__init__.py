"""The member side: members and stacked cohorts stepping, the hosts that run them, their random streams."""
