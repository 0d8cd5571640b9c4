//go:build tools

// Package tools pins the helm CLI that CI uses to lint and render the chart. Nothing here
// is compiled: `build` builds helm.sh/helm/v3/cmd/helm at the version this go.mod requires.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
