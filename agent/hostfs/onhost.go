package hostfs

// OnHost returns where the caller's path lies on this machine: path itself,
// or path under the directory given to WithRoot. The agent's resolver
// (agent.Resolver) verifies keys there, beneath a store's root, before it
// hands hostfs the caller's path.
func (l *Local) OnHost(path string) string { return l.onHost(path) }
