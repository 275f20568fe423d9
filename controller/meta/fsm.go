package meta

import (
	"fmt"
	"slices"
	"strings"
)

// Machine is a finite state machine: a table from (state, event) to the next
// state. Every state change of a record goes through its kind's Machine; an
// event the table does not list for the current state is refused.
//
// A Machine is immutable after NewMachine and safe for concurrent use.
type Machine[S comparable, E comparable] struct {
	initial   S
	table     map[S]map[E]S
	states    []S // every state named in the table, in first-seen order
	stateName func(S) string
}

// Edge is one row of a state table: Event moves a record in any of From to To.
type Edge[S comparable, E comparable] struct {
	From  []S
	Event E
	To    S
}

// NewMachine builds a Machine whose new records start in initial. stateName
// renders a state for messages (e.g. StoreStateName). A (state, event) pair
// listed twice with different targets is a programming error and panics, at
// package initialisation where the tables are declared.
func NewMachine[S comparable, E comparable](initial S, stateName func(S) string, edges ...Edge[S, E]) *Machine[S, E] {
	m := &Machine[S, E]{initial: initial, table: map[S]map[E]S{}, stateName: stateName}
	seen := func(s S) {
		if !slices.Contains(m.states, s) {
			m.states = append(m.states, s)
		}
	}
	seen(initial)
	for _, e := range edges {
		for _, from := range e.From {
			seen(from)
			row := m.table[from]
			if row == nil {
				row = map[E]S{}
				m.table[from] = row
			}
			if to, dup := row[e.Event]; dup && to != e.To {
				panic(fmt.Sprintf("meta: state table lists %s on %v twice (%s and %s)",
					stateName(from), e.Event, stateName(to), stateName(e.To)))
			}
			row[e.Event] = e.To
		}
		seen(e.To)
	}
	return m
}

// Initial is the state new records start in.
func (m *Machine[S, E]) Initial() S { return m.initial }

// Next returns the state event moves from to, and whether the table allows it.
func (m *Machine[S, E]) Next(from S, event E) (S, bool) {
	to, ok := m.table[from][event]
	return to, ok
}

// Events lists the events allowed in state from, sorted by name.
func (m *Machine[S, E]) Events(from S) []E {
	row := m.table[from]
	out := make([]E, 0, len(row))
	for e := range row {
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b E) int { return strings.Compare(fmt.Sprint(a), fmt.Sprint(b)) })
	return out
}

// AllEvents lists every event the table mentions, sorted by name.
func (m *Machine[S, E]) AllEvents() []E {
	var out []E
	for _, row := range m.table {
		for e := range row {
			if !slices.Contains(out, e) {
				out = append(out, e)
			}
		}
	}
	slices.SortFunc(out, func(a, b E) int { return strings.Compare(fmt.Sprint(a), fmt.Sprint(b)) })
	return out
}

// States lists every state the table mentions, the initial state first.
func (m *Machine[S, E]) States() []S { return slices.Clone(m.states) }

// StateName renders s the way CloudStack users know it ("PrepareForMaintenance").
func (m *Machine[S, E]) StateName(s S) string { return m.stateName(s) }
