"""The shadow side: everything after a copy is made. The scheduler and its link to the mirror
process, the queue and its guards, candidate calls, the compare workers, analysis and judgement,
and the sample records they store."""
