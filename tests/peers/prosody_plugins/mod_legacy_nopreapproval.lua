-- mod_legacy_nopreapproval: make Prosody look like a server without subscription
-- pre-approval (RFC 6121 3.4), which Prosody 0.12 otherwise supports and advertises.
--  * removes the urn:xmpp:features:pre-approval stream feature (<sub/>);
--  * ignores an outbound presence 'subscribed' when the contact has not asked to
--    subscribe (RFC 6121 3.1.5 for servers without pre-approval), so nothing is stored.

local rostermanager = require "core.rostermanager";
local jid_bare = require "util.jid".bare;

local PREAPPROVAL = "urn:xmpp:features:pre-approval";

-- mod_presence adds the feature at priority 0; run after it and take it out again.
module:hook("stream-features", function(event)
	event.features:remove_children("sub", PREAPPROVAL);
end, -1000);

local function drop_unsolicited_subscribed(event)
	local origin, stanza = event.origin, event.stanza;
	if stanza.attr.type ~= "subscribed" or origin.type ~= "c2s" or not origin.username then
		return; -- not ours to judge
	end
	local to_bare = stanza.attr.to and jid_bare(stanza.attr.to);
	if to_bare and not rostermanager.is_contact_pending_in(origin.username, origin.host, to_bare) then
		module:log("debug", "Ignoring unsolicited 'subscribed' to %s: no pre-approval here", to_bare);
		return true; -- handled: dropped before mod_presence stores a pre-approval
	end
end

-- Before mod_presence's outbound handlers (priority 0).
module:hook("pre-presence/bare", drop_unsolicited_subscribed, 100);
module:hook("pre-presence/full", drop_unsolicited_subscribed, 100);
