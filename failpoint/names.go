package failpoint

// The failpoints. Each names one moment where durable state changes.
const (
	// MetaBeforeCommit: a metadata transaction that creates, deletes,
	// transitions or updates a workflow's record (a job's only by an event)
	// is about to commit.
	MetaBeforeCommit = "metaBeforeCommit"
	// MetaAfterCommit: such a transaction has committed; its caller has not
	// seen the result yet.
	MetaAfterCommit = "metaAfterCommit"
	// JobBeforeStep: the controller is about to run a job's step (its
	// record says the step is next).
	JobBeforeStep = "jobBeforeStep"
	// JobAfterStep: a step ran; its result is not recorded yet.
	JobAfterStep = "jobAfterStep"
	// AgentTaskStart: the agent journalled a task and is about to run it.
	AgentTaskStart = "agentTaskStart"
	// AgentTaskFinish: the agent ran a task; its result is not journalled.
	AgentTaskFinish = "agentTaskFinish"
	// AgentBeforePublish: an object's staging file is complete and about
	// to be renamed into place.
	AgentBeforePublish = "agentBeforePublish"
	// AgentAfterPublish: the object was renamed into place.
	AgentAfterPublish = "agentAfterPublish"
	// ChunkAfterPut: one of a backup's chunks was stored (its upload is
	// under way: others are not yet).
	ChunkAfterPut = "chunkAfterPut"
	// ChunksBeforeManifest: a backup's chunks are stored, its manifest not.
	ChunksBeforeManifest = "chunksBeforeManifest"
	// LUNAfterCreate: a LUN was added to its target, its create step has
	// not answered yet.
	LUNAfterCreate = "lunAfterCreate"
	// ExportAfterGrant: an export (HTTP or NBD) was made, its grant not
	// answered yet.
	ExportAfterGrant = "exportAfterGrant"
	// JobAfterCancelRequested: a job was moved to Cancelling; its
	// running context (and so its agents' tasks) not cancelled yet.
	JobAfterCancelRequested = "jobAfterCancelRequested"
)

// Controller and Agent list the failpoints of each process on the path of
// the workflows (the crash matrix walks them); Requests lists those a
// user's request passes rather than a workflow (their own tests arm them).
var (
	Controller = []string{JobBeforeStep, JobAfterStep, MetaBeforeCommit, MetaAfterCommit}
	Agent      = []string{AgentTaskStart, AgentTaskFinish, AgentBeforePublish, AgentAfterPublish, ChunkAfterPut, ChunksBeforeManifest, LUNAfterCreate, ExportAfterGrant}
	Requests   = []string{JobAfterCancelRequested}
)
