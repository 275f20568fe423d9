package tgt

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/stowage/stowage/errdefs"
)

// CHAP accounts in tgt, and the holes this file keeps out of them.
//
// tgt keeps a target's bound accounts in an array of slots and a count,
// and walks the first count slots. Binding fills the first empty slot;
// unbinding empties the account's slot and lowers the count. Unbinding an
// account that is not in the last used slot therefore leaves an empty slot
// inside the walked range: the next `tgtadm --op show --mode target`
// dereferences it and tgtd dies (tgt 1.0.85, SIGSEGV: TestCHAPChurnLeavesNoHole),
// and the account that moved past the count can no longer log in. tgtadm's
// account delete unbinds the account from every target the same way.
//
// So this package only ever unbinds the account in the last slot. To take
// one out of the middle it unbinds the accounts after it (last first),
// then it, and binds those again (they refill the slots in order): pull.
// For that never to leave a target with no account at all (tgt then asks
// for no CHAP, and any initiator on the ACL logs in without it) the first
// slot of every target with accounts holds the guard account, which has a
// random secret nobody is told and is bound before any other. The guard is
// unbound (the target's last account, so no hole) when the last real
// account goes: then the target asks for no CHAP again, as it did before
// its first account. An account is deleted only once it is bound nowhere.
// Targets and Target leave the guard out.
//
// Between the unbind of an account after the pulled one and its bind
// again (milliseconds) that account cannot log in; an initiator retries.

// guardUser names the guard account (checkName refuses none of it, and no
// caller's user may take it).
const guardUser = "stowage-guard"

// SetCHAP implements LUNManager. tgt keeps accounts per daemon, bound to
// targets; an account of the same user already bound elsewhere is shared
// (one CHAP user per host, bound to every target the host may reach). tgt
// cannot show or check a secret: an account this Manager set with the same
// secret is only bound; any other existing account is replaced: pulled
// from every target it is bound to, deleted, made again with the secret
// and bound where it was. The secret is in tgtadm's argv while it runs
// (see the package doc); it never reaches a log or an error.
func (m *Manager) SetCHAP(ctx context.Context, iqn, user, secret string) error {
	if err := checkName("chap user", user); err != nil {
		return err
	}
	if user == guardUser {
		return fmt.Errorf("iscsi chap user %s: reserved for this package: %w", user, errdefs.ErrInvalid)
	}
	if secret == "" || strings.ContainsAny(secret, "\x00\n") {
		return fmt.Errorf("iscsi chap user %s: the secret is empty or has a NUL or newline: %w", user, errdefs.ErrInvalid)
	}
	unlock, err := m.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	ts, err := m.targets(ctx)
	if err != nil {
		return err
	}
	var target *Target
	var boundTo []string
	for i, t := range ts {
		if t.IQN == iqn {
			target = &ts[i]
		}
		if slices.Contains(t.Accounts, user) {
			boundTo = append(boundTo, t.IQN)
		}
	}
	if target == nil {
		return fmt.Errorf("iscsi target %s: %w", iqn, errdefs.ErrNotFound)
	}
	exists, err := m.accountExists(ctx, user)
	if err != nil {
		return err
	}
	sum := sha256.Sum256([]byte(secret))
	known := exists && m.set[user] == sum
	if known && slices.Contains(boundTo, iqn) {
		return nil // this secret, set here, and bound: nothing to change
	}
	// The rest must not stop half-way: a cancelled ctx would leave the
	// account unbound from targets it was on.
	ctx = context.WithoutCancel(ctx)
	delete(m.set, user) // until it is set again below
	switch {
	case known:
	case exists:
		for _, t := range boundTo {
			if err := m.pull(ctx, t, user); err != nil {
				return err
			}
		}
		if _, err := m.run(ctx, "delete account "+user, "--op", "delete", "--mode", "account", "--user", user); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		if err := m.newAccount(ctx, user, secret); err != nil {
			return err
		}
		for _, t := range boundTo {
			if err := m.bindAccount(ctx, t, user); err != nil {
				return err
			}
		}
	default:
		if err := m.newAccount(ctx, user, secret); err != nil {
			return err
		}
	}
	if !slices.Contains(boundTo, iqn) {
		if err := m.bindAccount(ctx, iqn, user); err != nil {
			return err
		}
	}
	m.set[user] = sum
	m.log.InfoContext(ctx, "iscsi chap set", "iqn", iqn, "user", user, "replaced", exists && !known)
	return nil
}

// RemoveCHAP implements LUNManager. The account is deleted once no target
// has it bound; a target left with no account asks for no CHAP.
func (m *Manager) RemoveCHAP(ctx context.Context, iqn, user string) error {
	if user == guardUser {
		return fmt.Errorf("iscsi chap user %s: reserved for this package: %w", user, errdefs.ErrInvalid)
	}
	unlock, err := m.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	ctx = context.WithoutCancel(ctx) // as in SetCHAP
	if err := m.pull(ctx, iqn, user); err != nil {
		return err
	}
	ts, err := m.targets(ctx)
	if err != nil {
		return err
	}
	stillBound := false
	for _, t := range ts {
		if t.IQN == iqn && slices.Equal(t.Accounts, []string{guardUser}) {
			if err := m.unbindAccount(ctx, t, guardUser); err != nil {
				return err
			}
		}
		stillBound = stillBound || slices.Contains(t.Accounts, user)
	}
	if !stillBound {
		delete(m.set, user)
		_, err := m.run(ctx, "delete account "+user, "--op", "delete", "--mode", "account", "--user", user)
		if err != nil && !errdefs.IsNotFound(err) {
			return err
		}
	}
	m.log.InfoContext(ctx, "iscsi chap removed", "iqn", iqn, "user", user, "account_deleted", !stillBound)
	return nil
}

// bindAccount binds user to the target iqn, after the guard (bound first
// if the target has no account yet).
func (m *Manager) bindAccount(ctx context.Context, iqn, user string) error {
	if err := m.ensureGuard(ctx, iqn); err != nil {
		return err
	}
	t, err := m.target(ctx, iqn)
	if err != nil {
		return err
	}
	if slices.Contains(t.Accounts, user) {
		return nil
	}
	return m.bind(ctx, t, user)
}

// pull unbinds user from the target iqn without leaving a hole (see the
// top of this file). A missing target or an account not bound is done.
func (m *Manager) pull(ctx context.Context, iqn, user string) error {
	t, err := m.target(ctx, iqn)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	i := slices.Index(t.Accounts, user)
	if i < 0 {
		return nil
	}
	if i == 0 && user != guardUser {
		// Bound before any guard: move the guard in front first.
		if err := m.ensureGuard(ctx, iqn); err != nil {
			return err
		}
		if t, err = m.target(ctx, iqn); err != nil {
			return err
		}
		if i = slices.Index(t.Accounts, user); i < 0 {
			return nil
		}
	}
	tail := t.Accounts[i+1:]
	for j := len(tail) - 1; j >= 0; j-- {
		if err := m.unbindAccount(ctx, t, tail[j]); err != nil {
			return err
		}
	}
	if err := m.unbindAccount(ctx, t, user); err != nil {
		return err
	}
	for _, u := range tail {
		if err := m.bind(ctx, t, u); err != nil {
			return err
		}
	}
	return nil
}

// ensureGuard makes the guard account the target's first. A target with
// accounts but no guard in front (bound by an older agent, or by hand)
// has them all unbound, last first, and bound again after the guard: for
// those few commands the target has no account. That happens once per
// target, and is logged.
func (m *Manager) ensureGuard(ctx context.Context, iqn string) error {
	t, err := m.target(ctx, iqn)
	if err != nil {
		return err
	}
	if len(t.Accounts) > 0 && t.Accounts[0] == guardUser {
		return nil
	}
	exists, err := m.accountExists(ctx, guardUser)
	if err != nil {
		return err
	}
	if !exists {
		var b [16]byte
		rand.Read(b[:])
		if err := m.newAccount(ctx, guardUser, hex.EncodeToString(b[:])); err != nil && !errdefs.IsAlreadyExists(err) {
			return err
		}
	}
	rebind := slices.DeleteFunc(slices.Clone(t.Accounts), func(u string) bool { return u == guardUser })
	if len(t.Accounts) > 0 {
		m.log.WarnContext(ctx, "iscsi target's CHAP accounts bound again behind the guard account", "iqn", iqn, "accounts", len(rebind))
	}
	for j := len(t.Accounts) - 1; j >= 0; j-- {
		if err := m.unbindAccount(ctx, t, t.Accounts[j]); err != nil {
			return err
		}
	}
	if err := m.bind(ctx, t, guardUser); err != nil {
		return err
	}
	for _, u := range rebind {
		if err := m.bind(ctx, t, u); err != nil {
			return err
		}
	}
	return nil
}

func (m *Manager) newAccount(ctx context.Context, user, secret string) error {
	_, err := m.runSecret(ctx, "new account "+user, secret, "--op", "new", "--mode", "account", "--user", user, "--password", secret)
	return err
}

// bind binds user to t in tgt's first free slot: the caller knows the
// slots before it are full.
func (m *Manager) bind(ctx context.Context, t Target, user string) error {
	_, err := m.run(ctx, "bind account "+user+" to "+t.IQN, "--op", "bind", "--mode", "account", "--tid", strconv.Itoa(t.TID), "--user", user)
	if errdefs.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// unbindAccount unbinds user from t: the caller knows it is in the last
// used slot.
func (m *Manager) unbindAccount(ctx context.Context, t Target, user string) error {
	_, err := m.run(ctx, "unbind account "+user+" from "+t.IQN, "--op", "unbind", "--mode", "account", "--tid", strconv.Itoa(t.TID), "--user", user)
	if errdefs.IsNotFound(err) {
		return nil
	}
	return err
}

func (m *Manager) accountExists(ctx context.Context, user string) (bool, error) {
	out, err := m.run(ctx, "show accounts", "--op", "show", "--mode", "account")
	if err != nil {
		return false, err
	}
	// "Account list:\n    u1\n    u2 (outgoing)\n"
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, " ") && strings.TrimSuffix(strings.TrimSpace(l), " (outgoing)") == user {
			return true, nil
		}
	}
	return false, nil
}
