"""One run across several processes: the launchers that start them (``launchers``), the ranks and the collectives
the loop uses (``ranks``), and FSDP2 sharding of the student (``sharding``). docs/distributed.md has the whole
picture."""
