#!/usr/bin/env bash
# The refresher people write when they have no operator: a loop per token that calls the
# refresh URL with curl and stores the answer with kubectl. The bench runs it to compare
# its cost per rotation with the operator's. Settings come from the environment:
#   NAIVE_URL NAIVE_KEY NAIVE_SECRET NAIVE_SEED NAIVE_NAME NAIVE_VALIDITY (seconds)
#   NAIVE_INTERVAL (seconds between refreshes) NAIVE_ROTATIONS NAIVE_KUBECONFIG NAIVE_CACHE
# It prints "rotations N" and then bash's `times` (its own and its children's CPU).
set -u
token=$NAIVE_SEED
ok=0
for ((i = 0; i < NAIVE_ROTATIONS; i++)); do
  if ((i > 0)); then sleep "$NAIVE_INTERVAL"; fi
  body=$(curl -sS --max-time 10 -G "$NAIVE_URL" \
    --data-urlencode "consumerkey=$NAIVE_KEY" \
    --data-urlencode "consumersecret=$NAIVE_SECRET" \
    --data-urlencode "oldtoken=$token" \
    --data-urlencode "validity=$NAIVE_VALIDITY")
  new=$(printf '%s' "$body" | sed -n 's/.*"accessToken":"\([^"]*\)".*/\1/p')
  if [ -z "$new" ]; then
    echo "refresh failed" >&2
    continue
  fi
  token=$new
  if kubectl --kubeconfig "$NAIVE_KUBECONFIG" --cache-dir "$NAIVE_CACHE" \
      create secret generic "$NAIVE_NAME" --from-literal=accessToken="$token" \
      --dry-run=client -o yaml |
    kubectl --kubeconfig "$NAIVE_KUBECONFIG" --cache-dir "$NAIVE_CACHE" --request-timeout=10s \
      apply -f - >/dev/null; then
    ok=$((ok + 1))
  else
    echo "store failed" >&2
  fi
done
echo "rotations $ok"
times
