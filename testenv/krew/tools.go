//go:build tools

// Package tools pins the krew CLI that testenv/krew/build compiles.
package tools

import _ "sigs.k8s.io/krew/cmd/krew"
