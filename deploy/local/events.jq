# One readable line per status event for `make run`'s console: time, status, refresh,
# consent, who asked, and the summary or the error. A line that is not a JSON event
# (e.g. refreshctl's own human output) is printed as it is.
(fromjson? // .)
| if type == "object" and (.data | type) == "object" then
    .data as $d
    | "\(.time // "-") \($d.status // .type)"
      + (if $d.refreshId then " refresh \($d.refreshId)" else "" end)
      + " consent \($d.consentId // .subject)"
      + (if $d.requestedBy then " (\($d.requestedBy))" else "" end)
      + (if ($d.summary | type) == "object" then
           " accounts \($d.summary.accountsUpdated) balances \($d.summary.balancesUpdated)"
           + " transactions +\($d.summary.transactionsAdded) ~\($d.summary.transactionsUpdated) -\($d.summary.transactionsRemoved)"
         else "" end)
      + (if ($d.error | type) == "object" then " error \($d.error.code): \($d.error.message)" else "" end)
  else . end
