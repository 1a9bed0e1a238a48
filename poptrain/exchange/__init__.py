"""What crosses between a host and the coordinator: the plan, the wire (values as columns), links and the channel, shared memory."""
